#!/bin/sh
# The "ssh" of MPICH hydra's ssh launcher for the namespace cluster (netns_cluster.py):
#   launch_in_node.sh [ssh options...] <node> <command...>
# runs the command, as ssh would (through a shell), in the node's network and UTS namespaces.
#
# FEDMPI_NODE_MOUNTS (optional; netns_cluster.node_mounts_env writes it) gives one node a view of
# the file system of its own: space-separated entries <node>=<source>:<target>, each mounted over
# <target> for the ranks of <node> only -- <source> a directory (bind mount) or the word tmpfs (an
# empty tmpfs: whatever was under <target> is absent on that node). Paths without spaces or quotes.
while [ $# -gt 0 ]; do
    case "$1" in
        -*) shift ;;                  # ssh options hydra may add (-x: no X forwarding)
        *) break ;;
    esac
done
node="$1"
shift
case "$node" in
    fedmpi-node[0-9]) ;;
    *) echo "launch_in_node.sh: $node is not a fedmpi namespace node" >&2; exit 255 ;;
esac
mounts=""
for entry in ${FEDMPI_NODE_MOUNTS-}; do
    case "$entry" in
        "$node="*:*)
            spec="${entry#*=}"
            source="${spec%%:*}"
            target="${spec#*:}"
            if [ "$source" = tmpfs ]; then
                mounts="$mounts mount -t tmpfs -o size=1m fedmpi-empty '$target' &&"
            else
                mounts="$mounts mount --bind '$source' '$target' &&"
            fi ;;
    esac
done
# `ip netns exec`, not nsenter --net: it also mounts a /sys of the node's namespace, where UCX
# looks for network devices (through the host's /sys it would find only lo usable). It gives the
# command a mount namespace of its own (mounts there do not propagate out), where the node's
# FEDMPI_NODE_MOUNTS are made before the command starts.
exec nsenter --uts="/run/fedmpi-netns/$node" -- ip netns exec "$node" sh -c "$mounts $*"
