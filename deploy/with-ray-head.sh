#!/usr/bin/env bash
# with-ray-head CMD [ARGS...]
#
# Start a Ray head node, wait until it answers, then run CMD (the paramserver front door) next to
# it in the same container. When either ends the other is stopped: the container exits with CMD's
# status, or 1 when Ray ended first, so that Kubernetes or Docker restarts the pair. SIGTERM and
# SIGINT go to CMD first (its graceful shutdown), then Ray is stopped.
#
# The `ray start` command comes from, in order:
#   $KUBERAY_GEN_RAY_START_CMD  set by KubeRay (>= 1.1) on RayClusters annotated
#                               ray.io/overwrite-container-cmd: "true" (it ends with --block);
#   $RAY_START_CMD              a command line of your own (it must block: --block);
#   the default                 a head node with no CPUs for tasks and the custom resource
#                               paramserver_head, which `serve --coordinator-resource` asks for.
# Both variables are run by bash, so KubeRay's quoting of rayStartParams (e.g. resources) holds.
# $RAY_WAIT_S: seconds to wait for Ray to answer (default 180).
set -uo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: with-ray-head CMD [ARGS...]" >&2
    exit 2
fi
ulimit -n 65536 2>/dev/null || true

if [ -n "${KUBERAY_GEN_RAY_START_CMD:-}" ]; then
    bash -c "$KUBERAY_GEN_RAY_START_CMD" &
elif [ -n "${RAY_START_CMD:-}" ]; then
    bash -c "$RAY_START_CMD" &
else
    ray start --head --block --port=6379 --dashboard-host=0.0.0.0 --num-cpus=0 \
        --resources='{"paramserver_head": 1}' &
fi
ray_pid=$!
cmd_pid=""

stop_ray() {
    ray stop --grace-period 10 >/dev/null 2>&1 || true
    kill -TERM "$ray_pid" 2>/dev/null || true
    wait "$ray_pid" 2>/dev/null || true
}

on_signal() {
    trap '' TERM INT
    status=143
    if [ -n "$cmd_pid" ]; then
        kill -TERM "$cmd_pid" 2>/dev/null || true
        wait "$cmd_pid"
        status=$?
    fi
    stop_ray
    exit "$status"
}
trap on_signal TERM INT

deadline=$((SECONDS + ${RAY_WAIT_S:-180}))
until ray health-check >/dev/null 2>&1; do
    if ! kill -0 "$ray_pid" 2>/dev/null; then
        echo "with-ray-head: ray start exited before Ray answered" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "with-ray-head: Ray did not answer within ${RAY_WAIT_S:-180} s" >&2
        stop_ray
        exit 1
    fi
    sleep 0.5
done

"$@" &
cmd_pid=$!
wait -n -p done_pid "$ray_pid" "$cmd_pid"
status=$?
if [ "${done_pid:-}" = "$cmd_pid" ]; then
    stop_ray
    exit "$status"
fi
echo "with-ray-head: Ray exited; stopping $1" >&2
kill -TERM "$cmd_pid" 2>/dev/null || true
wait "$cmd_pid"
stop_ray
exit 1
