from services.audit.app import build

if __name__ == "__main__":
    build().run()
