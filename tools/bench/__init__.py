"""`make bench`: what one recovery costs, and how close Clave gets to that cost.

A benchmark, not a test: it prints numbers and ratios and fails only when the stack
cannot be driven at all. Against the real local stack (`stack.sh run` starts it):

1. argon2id with the configured parameters (`shared.hashing.SecretHasher`): time per
   hash and per verify on one thread, hashes/s on `--threads` threads. From it the
   physical floor of one recovery: identity verifies one hash per configured security
   question; password verifies the new key against the key history (up to
   `PASSWORD_HISTORY` hashes; a freshly imported citizen has one) and hashes it once.
2. End to end: `--n` fresh citizens imported with `clave accounts import`, then driven
   `--concurrency` at a time exactly as the portal would (request -> recovery e-mail
   in the mail catcher -> reset with the link -> `completed` outcome). Throughput,
   latency percentiles, CPU time of every stack process per recovery, and the ratio of
   measured to the hashing floor.
3. `--dlq` malformed records on `recovery.requests`: events/s of one consumer pipeline
   on its cheapest path (parse, dead-letter through the outbox, audit), no argon2.
4. First of all (`--no-first-request` skips it): the services are restarted and, as soon
   as `stack.sh services-up` returns (every /readyz 200, as for `make up`), one request is
   timed to its e-mail: `first_request_to_mail_ms`.

The services' /metrics are read before and after; handler latency per topic comes
from the histogram deltas (interpolated within buckets, like histogram_quantile).

    deploy/local/stack.sh run -- .venv/bin/python -m tools.bench --n 200 --json bench.json
"""
