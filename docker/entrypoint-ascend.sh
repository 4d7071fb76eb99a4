#!/usr/bin/env bash
# Runs every container start: CANN's environment (library paths, ASCEND_* variables) must be set in
# the running process, so it is sourced here rather than in a build step.
set -euo pipefail
for env_script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$env_script" ]; then
        # shellcheck disable=SC1090
        set +u; source "$env_script"; set -u
    fi
done
exec tuner "$@"
