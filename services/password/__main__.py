from services.password.app import NAME, build
from services.password.settings import PasswordSettings
from shared.runtime import serve
from shared.settings import load

if __name__ == "__main__":
    serve(NAME, load(PasswordSettings), build)
