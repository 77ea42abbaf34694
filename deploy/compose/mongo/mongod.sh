#!/bin/bash
# One member of the compose stack's MongoDB replica set (mongo image), started as root by
# the image so it can install the replica set's key file as mongod requires (owner
# mongodb, mode 0400: a compose secret is mounted as the host file is), then the image's
# own entry point (which drops to the mongodb user) with deploy/compose/mongo/mongod.conf.
set -euo pipefail
install -m 0400 -o mongodb -g mongodb /run/secrets/mongodb_keyfile /etc/mongo-keyfile
exec docker-entrypoint.sh mongod --config /etc/clave/mongod.conf
