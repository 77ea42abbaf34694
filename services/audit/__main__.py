from services.audit.app import NAME, build
from services.audit.settings import AuditSettings
from shared.runtime import serve
from shared.settings import load

if __name__ == "__main__":
    serve(NAME, load(AuditSettings), build)
