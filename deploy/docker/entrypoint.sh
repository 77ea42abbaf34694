#!/bin/sh
# The image's entry point.
#
#   clave-entrypoint SERVICE [ARGS]   run one Clave service: identity, tokens, notifier,
#                                     password or audit (python -m services.SERVICE)
#   clave-entrypoint COMMAND [ARGS]   run anything else as given (`clave ...`, the
#                                     provisioning job)
#
# VAR__FILE=PATH sets VAR to the content of the file PATH (trailing newlines dropped) and
# unsets VAR__FILE: Docker and Compose secrets are files under /run/secrets, and this way
# no secret is written in a compose file, an env file or on a command line.  (Two
# underscores, so OpenSSL's own SSL_CERT_FILE is left alone.)
set -eu

SERVICES="identity tokens notifier password audit"

for name in $(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)__FILE=.*$/\1/p'); do
  path=""
  eval "path=\${${name}__FILE}"
  if [ ! -r "$path" ]; then
    echo "clave: ${name}__FILE=$path is not a readable file" >&2
    exit 78  # EX_CONFIG, as the services' own refusal of unsafe settings
  fi
  value=$(cat "$path")
  export "$name=$value"
  unset "${name}__FILE"
done

case "${1:---help}" in
  -h | --help)
    echo "usage: docker run IMAGE SERVICE   (one of: $SERVICES)"
    echo "       docker run IMAGE COMMAND [ARGS...]   (for instance: clave --help)"
    exit 64
    ;;
esac

for service in $SERVICES; do
  if [ "$1" = "$service" ]; then
    shift
    exec python -m "services.$service" "$@"
  fi
done
exec "$@"
