"""Windowed reads: cytoclr's readers vs a direct tifffile / zarr read of the same windows, in one run.

A 16k x 16k uint8 section (256 MB decoded) stored as a zlib-tiled TIFF (256 px tiles) and as an
OME-Zarr level (256 px chunks, zstd). 300 random 512 x 512 windows (the size of a patch) are read
by our reader and by the peer taking turns window by window, repeated 5 times; we print the median time per window and the ratio
ours / peer (goal: <= 1.2). Peer for TIFF: tifffile's own zarr store (`series.aszarr()`, opened once);
peer for zarr: `zarr.open_array(...)[window]`. Run: .venv/bin/python benchmarks/bench_windowed_read.py
"""
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr

from cytoclr.readers import open_image
from cytoclr.sections import ImageSection

N, T, W, REPEATS, WINDOWS = 16384, 256, 512, 5, 300


def write_inputs(d: Path, rng):
    pool = [rng.integers(0, 255, (T, T), dtype=np.uint8) for _ in range(16)]  # realistic entropy, fast to write
    order = rng.integers(0, 16, (N // T) ** 2)
    tif = d / "big.tif"
    tifffile.imwrite(tif, (pool[i] for i in order), shape=(N, N), dtype=np.uint8, tile=(T, T), compression="zlib",
                     bigtiff=True)
    zp = d / "big.ome.zarr"
    g = zarr.open_group(str(zp), mode="w")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
                                                         "datasets": [{"path": "0"}]}]}
    a = g.create_array("0", shape=(1, N, N), chunks=(1, T, T), dtype="uint8", compressors=zarr.codecs.ZstdCodec(level=3))
    for r in range(0, N, 2048):  # same tiles as the TIFF, written in bands
        band = np.block([[pool[order[(r // T + i) * (N // T) + j]] for j in range(N // T)] for i in range(2048 // T)])
        a[0, r:r + 2048] = band
    return tif, zp


def timed_interleaved(cases: dict, windows) -> dict:
    "ms per window for each case; the cases take turns window by window, so load from other processes hits all alike."
    total = dict.fromkeys(cases, 0.0)
    for i, (r, c) in enumerate(windows):
        order = list(cases.items())
        for k, fn in (order if i % 2 else order[::-1]):  # alternate who reads a window first
            t = time.perf_counter()
            fn(r, c)
            total[k] += time.perf_counter() - t
    return {k: v / len(windows) * 1e3 for k, v in total.items()}


def main():
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        tif, zp = write_inputs(Path(d), rng)
        print(f"inputs written in {time.perf_counter() - t0:.1f} s ({N} x {N} px, {T} px tiles/chunks, {W} px windows)")
        windows = [tuple(x) for x in rng.integers(0, N - W, (WINDOWS, 2))]
        ours_tif, ours_zarr = open_image(tif), open_image(zp)
        sec = ImageSection(ours_tif, "nissl", 20.0, [[0, 0.02, 0], [0, 0, 0], [-0.02, 0, 0]])
        tf = tifffile.TiffFile(tif)
        peer_tif = zarr.open_array(tf.series[0].aszarr(), mode="r")
        peer_zarr = zarr.open_array(str(zp / "0"), mode="r")
        r, c = windows[0]
        assert np.array_equal(ours_tif.read(slice(r, r + W), slice(c, c + W))[0], peer_tif[r:r + W, c:c + W])
        assert np.array_equal(ours_zarr.read(slice(r, r + W), slice(c, c + W))[0], peer_zarr[0, r:r + W, c:c + W])
        cases = {
            "tiff: ours (reader)": lambda r, c: ours_tif.read(slice(r, r + W), slice(c, c + W)),
            "tiff: ours (Section.read, float32)": lambda r, c: sec.read(slice(r, r + W), slice(c, c + W)),
            "tiff: peer tifffile aszarr": lambda r, c: peer_tif[r:r + W, c:c + W],
            "zarr: ours (reader)": lambda r, c: ours_zarr.read(slice(r, r + W), slice(c, c + W)),
            "zarr: peer zarr": lambda r, c: peer_zarr[0, r:r + W, c:c + W],
        }
        for fn in cases.values():  # warm up handles and the page cache: we time decoding, not the disk
            for r, c in windows:
                fn(r, c)
        times = {k: [] for k in cases}
        for _ in range(REPEATS):
            for k, v in timed_interleaved(cases, windows).items():
                times[k].append(v)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:38s} {v:7.3f} ms / window (median of {REPEATS})")
        print(f"ratio tiff ours/peer: {med['tiff: ours (reader)'] / med['tiff: peer tifffile aszarr']:.2f}  "
              f"(Section.read incl. float conversion: {med['tiff: ours (Section.read, float32)'] / med['tiff: peer tifffile aszarr']:.2f})")
        print(f"ratio zarr ours/peer: {med['zarr: ours (reader)'] / med['zarr: peer zarr']:.2f}  (goal <= 1.2)")
        tf.close()


if __name__ == "__main__":
    main()
