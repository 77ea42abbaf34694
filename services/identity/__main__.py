from services.identity.app import NAME, build
from services.identity.settings import IdentitySettings
from shared.runtime import serve
from shared.settings import load

if __name__ == "__main__":
    serve(NAME, load(IdentitySettings), build)
