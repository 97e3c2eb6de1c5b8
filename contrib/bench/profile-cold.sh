#!/bin/bash
# One cold read of a 13,000-file tree through a fresh view, with the filler's CPU per thread and,
# optionally, a profile of it. Root; about 1 minute. Everything it makes is removed when it ends.
#
#   contrib/bench/profile-cold.sh HSMFS_CHECKOUT OUT_PREFIX [none|perf|py-spy]
#   CONF=policy.toml contrib/bench/profile-cold.sh ...   # mount with that policy (e.g. workers = 1)
#
# perf:   OUT_PREFIX.perf  (perf report -i OUT_PREFIX.perf --no-children --sort symbol)
# py-spy: OUT_PREFIX.raw   (collapsed stacks, one thread per root frame)
set -u
WT=$(realpath "$1"); OUT=$2; MODE=${3:-none}
B=$(mktemp -d /var/tmp/hsmfs-profile-XXXXXX)
SP=
cleanup() {
  [ -n "$SP" ] && kill -INT "$SP" 2>/dev/null && wait "$SP"
  PYTHONPATH=$WT python3 -m hsmfs umount "$B/view" >/dev/null 2>&1
  umount "$B/src" "$B/store" 2>/dev/null
  rm -f "/var/log/hsmfs/prof$$.log"
  rm -rf "$B"
}
trap cleanup EXIT
mkdir -p "$B/src" "$B/store" "$B/view"
truncate -s 4G "$B/src.img" "$B/store.img"
mkfs.ext4 -q -F "$B/src.img" && mkfs.ext4 -q -F "$B/store.img" || exit 1
mount -o loop "$B/src.img" "$B/src" && mount -o loop "$B/store.img" "$B/store" || exit 1
mkdir "$B/src/tree" && cp -a /usr/include /usr/lib/python3.11 /usr/share/doc "$B/src/tree/"
find "$B/src/tree" -type f > "$B/list.txt"
echo "files: $(wc -l < "$B/list.txt")"
read_all() {  # $1: file list; prints the seconds the read took
  python3 - "$1" <<'PY'
import sys, time
paths = [p for p in open(sys.argv[1]).read().split("\n") if p]
t0 = time.monotonic()
for p in paths:
    with open(p, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
print(f"{time.monotonic() - t0:.3f}")
PY
}
sync; echo 3 > /proc/sys/vm/drop_caches
echo "source cold read: $(read_all "$B/list.txt") s"
PYTHONPATH=$WT python3 -m hsmfs mount --name "prof$$" ${CONF:+--config "$CONF"} --store "$B/store/s" "$B/src/tree" "$B/view" || exit 1
SUP=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pid'])" "/run/hsmfs/prof$$.json")
FP=$(pgrep -P "$SUP" | head -1)  # the filler: the supervisor's child
[ -n "$FP" ] || { echo "no filler found under supervisor $SUP" >&2; exit 1; }
sed "s#$B/src/tree#$B/view#" "$B/list.txt" > "$B/vlist.txt"
sync; echo 3 > /proc/sys/vm/drop_caches
case $MODE in
  perf) perf record -F 499 -g -p "$FP" -o "$OUT.perf" >/dev/null 2>&1 & SP=$!; sleep 1 ;;
  py-spy) py-spy record -p "$FP" -r 250 --threads -f raw -o "$OUT.raw" >/dev/null 2>&1 & SP=$!; sleep 1 ;;
esac
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$FP/stat")
echo "view cold read: $(read_all "$B/vlist.txt") s"
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$FP/stat")
tck=$(getconf CLK_TCK)
echo "filler CPU: user $(( (u1 - u0) * 1000 / tck )) ms, system $(( (s1 - s0) * 1000 / tck )) ms"
for t in /proc/"$FP"/task/*; do
  echo "  thread $(basename "$t"): user+system since start $(awk -v t="$tck" '{printf "%d ms", ($14 + $15) * 1000 / t}' "$t/stat")"
done
PYTHONPATH=$WT python3 -m hsmfs status --json "prof$$" | python3 -c \
  "import json,sys; d=json.load(sys.stdin)[0]['filler']; print({k: d[k] for k in ('events', 'fills', 'ahead_fills', 'commits')})"
