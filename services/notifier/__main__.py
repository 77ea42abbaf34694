from services.notifier.app import NAME, build
from services.notifier.settings import NotifierSettings
from shared.runtime import serve
from shared.settings import load

if __name__ == "__main__":
    serve(NAME, load(NotifierSettings), build)
