from services.tokens.app import NAME, build
from services.tokens.settings import TokensSettings
from shared.runtime import serve
from shared.settings import load

if __name__ == "__main__":
    serve(NAME, load(TokensSettings), build)
