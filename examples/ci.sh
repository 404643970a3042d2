#!/usr/bin/env bash
# A CI job on a machine with narq set up (daemon running, hook in nix.conf): build, then make
# sure everything reached the cache before the machine goes away.
set -euo pipefail
nix-build                                   # the hook enqueues every path as it is built
narq push ./result                          # also what was substituted, not built (optional)
narq wait --timeout 1800                    # 0: all uploaded; 1: a path failed; 3: timed out
narq status
