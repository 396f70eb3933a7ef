#!/usr/bin/env python3
"""What placement alone can reach on a trace: a model of one growable address range, without
streams, class caches or fences, to tell which part of gpupool's peak ÷ live is policy and
which part is the page size (issue 11).

    python3 devscripts/placement_bounds.py TRACE.csv.gz [--policy P ...] [--page-mib 2]

Requests up to 1 MiB count as their bytes rounded to 512 (an ideal small-block pool); larger
ones are placed in the range, rounded to 512, with free neighbours always merged. Reserved
bytes are the pages with a live block on them (mapped pages) plus the small bytes. Policies:

  best-fit        smallest free range that fits, lowest address first; pages stay mapped once
                  mapped (what gpupool's arena did before session 18)
  spare-frontier  best fit, but the free range touching the unmapped end of the range is
                  passed over while another fits (PyTorch's expandable segments rank it by the
                  size it can grow to; gpupool's arena since session 18)
  unmap-free      best fit, and every page no block uses is unmapped at once: the floor of any
                  policy that keeps best fit, at a driver call per page
  reclaim-aware   placement that needs the fewest new pages (either end of each free range),
                  and, before mapping past the peak, the free pages least recently used are
                  unmapped, as many as the excess: the fewest page moves this model finds

Prints per policy: peak reserved ÷ peak live, pages mapped and unmapped (each a driver call of
~56 and ~70 µs on the H200, BENCHMARKS.md). Pure Python; a 100,000-event trace takes under a
minute, the 1,000,000-event ones several.
"""
import argparse
import gzip

SMALL = 1 << 20


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as lines:
        next(lines)
        return [(op, int(i), int(s)) for op, i, s, _ in (l.strip().split(",") for l in lines)]


def rounded(size):
    return (size + 511) // 512 * 512


class SmallRange:
    """Requests up to 1 MiB in an address range of their own (PyTorch's small pool with
    expandable segments): best fit, free neighbours merged, pages mapped once touched and never
    unmapped."""

    def __init__(self):
        self.free = {}
        self.top = 0

    def take(self, need):
        fits = [(b, a) for a, b in self.free.items() if b >= need]
        if fits:
            free_bytes, at = min(fits)
            del self.free[at]
            if free_bytes > need:
                self.free[at + need] = free_bytes - need
            return at
        tail = [a for a, b in self.free.items() if a + b == self.top]
        at = tail[0] if tail else self.top
        if tail:
            del self.free[at]
        self.top = at + need
        return at

    def give(self, at, need):
        end = at + need
        if end in self.free:
            need += self.free.pop(end)
        before = [a for a, b in self.free.items() if a + b == at]
        if before:
            need += self.free.pop(before[0])
            at = before[0]
        self.free[at] = need

    def mapped_bytes(self, page):
        return (self.top + page - 1) // page * page


def replay(events, policy, page, separate_small=False):
    small_range = SmallRange() if separate_small else None
    free = {}  # address -> bytes
    top = 0  # end of the space ever placed in
    live = {}
    count = {}  # page -> live blocks on it
    mapped = {}  # page -> last use (event index)
    small = live_bytes = peak_live = peak = peak_pages = 0
    maps = unmaps = 0

    def pages(address, size):
        return range(address // page, (address + size - 1) // page + 1)

    def unmapped_in(address, size):
        return sum(1 for p in pages(address, size) if p not in mapped)

    for index, (op, ident, size) in enumerate(events):
        if op == "a":
            live_bytes += size
            peak_live = max(peak_live, live_bytes)
            need = rounded(size)
            if size <= SMALL and small_range is not None:
                at = small_range.take(need)
                live[ident] = (-1 - at, need)
                small = small_range.mapped_bytes(page)
            elif size <= SMALL:
                small += need
                live[ident] = (None, need)
            else:
                choice = None
                for address, free_bytes in free.items():
                    if free_bytes < need:
                        continue
                    if policy == "reclaim-aware":
                        for at in (address, address + free_bytes - need):
                            key = (unmapped_in(at, need), free_bytes, at)
                            if choice is None or key < choice[0]:
                                choice = (key, address, at)
                    else:
                        grows = policy == "spare-frontier" and address + free_bytes == top
                        key = (grows, free_bytes, address)
                        if choice is None or key < choice[0]:
                            choice = (key, address, address)
                if choice is None:
                    tail = [a for a, b in free.items() if a + b == top]
                    at = tail[0] if tail else top
                    if tail:
                        del free[at]
                    top = at + need
                else:
                    _, address, at = choice
                    free_bytes = free.pop(address)
                    if at > address:
                        free[address] = at - address
                    if address + free_bytes > at + need:
                        free[at + need] = address + free_bytes - at - need
                live[ident] = (at, need)
                wanted = [p for p in pages(at, need) if p not in mapped]
                excess = len(mapped) + len(wanted) - peak_pages
                if policy == "reclaim-aware" and wanted and excess > 0:
                    idle = sorted(
                        (p for p in mapped if not count.get(p) and p not in pages(at, need)),
                        key=mapped.get,
                    )
                    for p in idle[:excess]:
                        del mapped[p]
                        unmaps += 1
                for p in wanted:
                    maps += 1
                for p in pages(at, need):
                    mapped[p] = index
                    count[p] = count.get(p, 0) + 1
                peak_pages = max(peak_pages, len(mapped))
            peak = max(peak, len(mapped) * page + small)
        elif ident in live:
            at, need = live.pop(ident)
            live_bytes -= size
            if at is None:
                small -= need
                continue
            if at < 0:
                small_range.give(-1 - at, need)
                continue
            for p in pages(at, need):
                count[p] -= 1
                mapped[p] = index
                if policy == "unmap-free" and count[p] == 0:
                    del mapped[p]
                    unmaps += 1
            end = at + need
            if end in free:
                need += free.pop(end)
            before = [a for a, b in free.items() if a + b == at]
            if before:
                need += free.pop(before[0])
                at = before[0]
            free[at] = need
    return peak / peak_live, maps, unmaps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--policy", action="append", choices=["best-fit", "spare-frontier", "unmap-free", "reclaim-aware"])
    parser.add_argument("--page-mib", type=int, default=2)
    parser.add_argument("--small-range", action="store_true", help="requests up to 1 MiB in a best-fit range of their own, never unmapped, instead of an ideal small pool")
    args = parser.parse_args()
    events = read(args.trace)
    for policy in args.policy or ["best-fit", "spare-frontier", "unmap-free", "reclaim-aware"]:
        ratio, maps, unmaps = replay(events, policy, args.page_mib << 20, args.small_range)
        print(f"{args.trace.split('/')[-1]:<28} {policy:<15} peak/live {ratio:.4f}  pages mapped {maps:>6}  unmapped {unmaps:>6}")


if __name__ == "__main__":
    main()
