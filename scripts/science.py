#!/usr/bin/env python3
"""Science reads for scripts/bench.py: the files researchers keep in a data
store and the one small read each kind of file usually gets.

    python science.py gen DATASET-FOLDER [SCALE]   write the fixtures (once)
    python science.py read READER PATH             one timed read, prints JSON

Needs the packages of scripts/bench-requirements.txt (bench.py runs this
file with the python of its own venv).

`gen` writes five files and a series of 30, deterministically (seeded),
into the folder (bench.py gives it {data}/10378.1/5, dataset 10378.1/5 of
the emulator):

    ocean.nc       NetCDF4 (HDF5), temp(time, lat, lon) float32, chunks
                   (1, 256, 256), zlib + shuffle; 24 hourly steps of a
                   1440 x 2880 grid, about 270 MB on disk
    grid.h5        HDF5, elevation(12, 2048, 2048) float32, chunks
                   (1, 256, 256), gzip + shuffle, about 115 MB
    table.parquet  2,400,000 rows, 7 columns, 12 row groups, about 100 MB
    dem.tif        Cloud-Optimized GeoTIFF, 5632 x 5632 float32, 512 x 512
                   tiles, deflate, internal overviews, about 100 MB
    index.sqlite   1,600,000 rows and an index on `station`, about 100 MB
    series/ocean_20240101.nc ... series/ocean_20240130.nc
                   30 daily NetCDF4 files of one model run, about 6.3 MB
                   each (a little more or less: each day's data compresses
                   differently): temp(time, lat, lon) float32, 24 hourly
                   steps of a 256 x 384 regional grid (1/8 degree, as
                   ocean.nc), chunks (1, 128, 128), zlib + shuffle

SCALE (BENCH_SCALE) divides the outermost dimension (time steps, layers,
rows; a series file's hourly steps, the 30 files stay); the chunking, the
grids and so the reads' shapes stay. A file is written again only when its
parameters (and VERSION) differ from what `fixtures.json` in the same
folder recorded for it, or its size from the size recorded: adding a file
does not rewrite the others.

`read` imports its library and opens a tiny local file of the same format
first (xarray finds its backends, GDAL registers its drivers, ...), then
times `open` to result on PATH (a file, or for a series the folder of its
files), and prints one JSON line: {"seconds",
"result" (shape and CRC-32 of what was read, equal for every tool),
"rchar" (bytes the process read through read(2) and friends meanwhile,
from /proc/self/io: what the reader asked the file system for)}.
"""
import json, os, sys, tempfile, time, zlib

VERSION = 1
# A series: daily files of one run in a folder of the dataset, read together
# (xarray.open_mfdataset). Its own folder, so that the read's glob and every
# tool's listing see the series alone.
SERIES_DIR, SERIES_DAYS = "series", 30
SERIES = [f"{SERIES_DIR}/ocean_202401{d:02d}.nc" for d in range(1, SERIES_DAYS + 1)]
FILES = ["ocean.nc", "grid.h5", "table.parquet", "dem.tif", "index.sqlite"] + SERIES

# Full-size parameters; SCALE divides the first of each.
OCEAN_T, OCEAN_LAT, OCEAN_LON = 24, 1440, 2880
GRID_N, GRID_Y, GRID_X = 12, 2048, 2048
TABLE_ROWS, TABLE_GROUPS = 2_400_000, 12
DEM_H, DEM_W = 5632, 5632
SQL_ROWS, SQL_STATIONS = 1_600_000, 10_000
# A series file: hourly steps of a regional grid at 1/8 degree (32 x 48
# degrees, the Tasman Sea), south-west corner of its first cell.
SERIES_T, SERIES_LAT, SERIES_LON = 24, 256, 384
SERIES_ORIGIN = (-50.0, 130.0)

# The reads. xarray: one time step, a 50 x 90 degree lat/lon box
# (400 x 720 points, 1.1 MiB); h5py: 600 x 600 of the middle layer
# (1.4 MiB); pyarrow: column `value` (float32) of every row group; rasterio:
# an 800 x 600 window (1.8 MiB) across 3 x 3 tiles; sqlite: the readings of
# one station through the index; xarray_mf (open_mfdataset): the hourly
# series of one point across the 30 files (720 values; in each file 24 of
# its 144 chunks, about 1 MB of its 6.3, but the netCDF library reads the
# first 4 MiB of every file it opens, ocean.nc's too: about 5.3 MB a file
# asked in all).
LAT_BOX, LON_BOX = (-20.0, 29.99), (100.0, 189.99)
STATION = 4242
POINT = (-33.95, 151.2)
# What the series read globs in the folder it is given: the series' files
# alone (a stray file in the folder, e.g. a writer's .tmp, would be left out).
SERIES_GLOB = "ocean_2024*.nc"


def params(scale):
    s = max(1, int(scale))
    return {
        "version": VERSION,
        "ocean.nc": [max(1, OCEAN_T // s), OCEAN_LAT, OCEAN_LON],
        "grid.h5": [max(1, GRID_N // s), GRID_Y, GRID_X],
        "table.parquet": [max(TABLE_GROUPS * 1000, TABLE_ROWS // s), TABLE_GROUPS],
        "dem.tif": [max(1024, DEM_H // s // 512 * 512), DEM_W],
        "index.sqlite": [max(50_000, SQL_ROWS // s), SQL_STATIONS],
        # Every file of the series has these parameters.
        "series": [max(1, SERIES_T // s), SERIES_LAT, SERIES_LON, SERIES_DAYS],
    }


def param_key(name):
    """The key of params() that holds a fixture's parameters."""
    return "series" if name in SERIES else name


def _smooth(lat, lon, phase):
    import numpy as np
    la, lo = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    return (15 + 12 * np.cos(la) + 3 * np.sin(3 * lo + phase) * np.cos(2 * la)).astype("f4")


def gen_ocean(path, p):
    import numpy as np, netCDF4
    nt, ny, nx = p
    rng = np.random.default_rng(1)
    lat = np.linspace(-89.9375, 89.9375, ny)
    lon = np.linspace(0.0625, 359.9375, nx)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.title = "provenafs bench: synthetic sea temperature"
        ds.createDimension("time", None)
        ds.createDimension("lat", ny)
        ds.createDimension("lon", nx)
        t = ds.createVariable("time", "f8", ("time",))
        t.units, t.calendar, t.standard_name = "hours since 2020-01-01 00:00:00", "standard", "time"
        v = ds.createVariable("lat", "f8", ("lat",))
        v.units, v.standard_name = "degrees_north", "latitude"
        v[:] = lat
        v = ds.createVariable("lon", "f8", ("lon",))
        v.units, v.standard_name = "degrees_east", "longitude"
        v[:] = lon
        temp = ds.createVariable("temp", "f4", ("time", "lat", "lon"), zlib=True, complevel=4,
                                 shuffle=True, chunksizes=(1, 256, 256), fill_value=np.float32(-999))
        temp.units, temp.standard_name = "degC", "sea_water_temperature"
        for k in range(nt):
            t[k] = k
            temp[k] = _smooth(lat, lon, k / 4) + rng.standard_normal((ny, nx), dtype="f4") * 0.8


def gen_grid(path, p):
    import numpy as np, h5py
    n, ny, nx = p
    rng = np.random.default_rng(2)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("elevation", (n, ny, nx), dtype="f4", chunks=(1, 256, 256),
                             compression="gzip", compression_opts=4, shuffle=True)
        d.attrs["units"] = "m"
        y, x = np.linspace(-60, 60, ny), np.linspace(0, 360, nx)
        for k in range(n):
            d[k] = 100 * _smooth(y, x, k) + rng.standard_normal((ny, nx), dtype="f4") * 5
        f.create_dataset("x", data=x)
        f.create_dataset("y", data=y)


def gen_table(path, p):
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    rows, groups = p
    rng = np.random.default_rng(3)
    per = -(-rows // groups)
    with pq.ParquetWriter(path, pa.schema([
            ("id", pa.int64()), ("time", pa.timestamp("ms")), ("station", pa.int32()),
            ("lat", pa.float64()), ("lon", pa.float64()), ("value", pa.float32()),
            ("quality", pa.uint8())])) as w:
        for g in range(groups):
            lo, hi = g * per, min(rows, (g + 1) * per)
            n = hi - lo
            w.write_table(pa.table({
                "id": np.arange(lo, hi, dtype="i8"),
                "time": pa.array(1577836800000 + np.arange(lo, hi, dtype="i8") * 1000, pa.timestamp("ms")),
                "station": rng.integers(0, SQL_STATIONS, n, dtype="i4"),
                "lat": rng.uniform(-90, 90, n), "lon": rng.uniform(-180, 180, n),
                "value": rng.standard_normal(n, dtype="f4"),
                "quality": rng.integers(0, 4, n, dtype="u1"),
            }), row_group_size=per)


def gen_dem(path, p):
    import numpy as np, rasterio, rasterio.shutil
    from rasterio.transform import from_origin
    h, w = p
    rng = np.random.default_rng(4)
    tmp = path + ".gtiff.tmp"
    prof = dict(driver="GTiff", width=w, height=h, count=1, dtype="float32", crs="EPSG:4326",
                transform=from_origin(140.0, -10.0, 0.0025, 0.0025), tiled=True,
                blockxsize=512, blockysize=512)
    y, x = np.linspace(-30, 30, h), np.linspace(0, 360, w)
    with rasterio.open(tmp, "w", **prof) as dst:
        for r0 in range(0, h, 512):
            r1 = min(h, r0 + 512)
            a = 30 * _smooth(y[r0:r1], x, 0) + rng.standard_normal((r1 - r0, w), dtype="f4") * 2
            dst.write(a.astype("f4"), 1, window=((r0, r1), (0, w)))
    try:
        rasterio.shutil.copy(tmp, path, driver="COG", BLOCKSIZE=512, COMPRESS="DEFLATE",
                             PREDICTOR="YES", OVERVIEWS="AUTO", RESAMPLING="AVERAGE")
    finally:
        os.remove(tmp)


def gen_sqlite(path, p):
    import numpy as np, sqlite3
    rows, stations = p
    rng = np.random.default_rng(5)
    con = sqlite3.connect(path)
    con.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA page_size=4096;"
                      "CREATE TABLE readings (id INTEGER PRIMARY KEY, station INTEGER NOT NULL,"
                      " t REAL NOT NULL, value REAL NOT NULL, flag INTEGER NOT NULL, note TEXT NOT NULL);")
    batch = 100_000
    for lo in range(0, rows, batch):
        n = min(batch, rows - lo)
        st = rng.integers(0, stations, n)
        val = rng.standard_normal(n)
        flag = rng.integers(0, 8, n)
        notes = rng.integers(0, 256, (n, 12), dtype="u1")
        con.executemany("INSERT INTO readings VALUES (?,?,?,?,?,?)",
                        ((lo + i, int(st[i]), (lo + i) * 60.0, float(val[i]), int(flag[i]),
                          notes[i].tobytes().hex()) for i in range(n)))
    con.execute("CREATE INDEX readings_station ON readings (station)")
    con.commit()
    con.close()


def gen_series_day(path, p, day):
    """Day `day` (1-based) of the series: its hours continue the previous
    day's (time is hours since 2024-01-01), its noise has a seed of its own,
    so each file is different and compresses a little differently, as a
    real run's daily files do."""
    import numpy as np, netCDF4
    nt, ny, nx, _ = p
    rng = np.random.default_rng(100 + day)
    lat = SERIES_ORIGIN[0] + 0.0625 + 0.125 * np.arange(ny)
    lon = SERIES_ORIGIN[1] + 0.0625 + 0.125 * np.arange(nx)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        ds.title = f"provenafs bench: synthetic sea temperature, 2024-01-{day:02d}"
        ds.createDimension("time", None)
        ds.createDimension("lat", ny)
        ds.createDimension("lon", nx)
        t = ds.createVariable("time", "f8", ("time",))
        t.units, t.calendar, t.standard_name = "hours since 2024-01-01 00:00:00", "standard", "time"
        v = ds.createVariable("lat", "f8", ("lat",))
        v.units, v.standard_name = "degrees_north", "latitude"
        v[:] = lat
        v = ds.createVariable("lon", "f8", ("lon",))
        v.units, v.standard_name = "degrees_east", "longitude"
        v[:] = lon
        temp = ds.createVariable("temp", "f4", ("time", "lat", "lon"), zlib=True, complevel=4,
                                 shuffle=True, chunksizes=(1, 128, 128), fill_value=np.float32(-999))
        temp.units, temp.standard_name = "degC", "sea_water_temperature"
        for k in range(nt):
            hour = (day - 1) * 24 + k * (24 // nt)
            t[k] = hour
            temp[k] = _smooth(lat, lon, hour / 4) + rng.standard_normal((ny, nx), dtype="f4") * 0.8


GEN = {"ocean.nc": gen_ocean, "grid.h5": gen_grid, "table.parquet": gen_table,
       "dem.tif": gen_dem, "index.sqlite": gen_sqlite}
GEN.update({name: (lambda day: lambda path, p: gen_series_day(path, p, day))(i + 1)
            for i, name in enumerate(SERIES)})


def gen(dirpath, scale=1, log=lambda *a: print(*a, file=sys.stderr, flush=True)):
    """Write the fixtures into dirpath unless fixtures.json there says
    they are already written with these parameters and sizes. The
    parameters are compared per file (VERSION for all of them), so a
    fixture added to the set is written alone."""
    os.makedirs(dirpath, exist_ok=True)
    prm = params(scale)
    man_path = os.path.join(dirpath, "fixtures.json")
    try:
        man = json.load(open(man_path))
    except (OSError, ValueError):
        man = {}
    old = man.get("params", {})
    same = lambda name: (old.get("version") == prm["version"]
                         and old.get(param_key(name)) == prm[param_key(name)])
    sizes = {k: v for k, v in man.get("sizes", {}).items() if k in FILES and same(k)}
    for name in FILES:
        path = os.path.join(dirpath, name)
        if name in sizes and os.path.exists(path) and os.path.getsize(path) == sizes[name]:
            continue
        log(f"science: writing {path}")
        t = time.perf_counter()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
        GEN[name](tmp, prm[param_key(name)])
        os.replace(tmp, path)
        sizes[name] = os.path.getsize(path)
        log(f"science: {name} {sizes[name] / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")
        # Written after each file: an interrupted run keeps what it made.
        with open(man_path + ".tmp", "w") as f:
            json.dump({"params": prm, "sizes": sizes}, f, indent=1)
        os.replace(man_path + ".tmp", man_path)
    return sizes


# ---- readers: one realistic small read each, open to result ----

def summary(a):
    import numpy as np
    a = np.ascontiguousarray(a)
    return {"shape": list(a.shape), "crc32": zlib.crc32(a.tobytes()),
            "mean": round(float(a.mean()), 4) if a.size else None}


def read_xarray(path):
    import xarray as xr
    with xr.open_dataset(path, engine="netcdf4") as ds:
        temp = ds["temp"]
        a = temp.isel(time=temp.sizes["time"] // 2).sel(lat=slice(*LAT_BOX), lon=slice(*LON_BOX)).values
    return summary(a)


def read_h5py(path):
    import h5py
    with h5py.File(path, "r") as f:
        d = f["elevation"]
        a = d[d.shape[0] // 2, 700:1300, 500:1100]
    return summary(a)


def read_pyarrow(path):
    import pyarrow.parquet as pq
    t = pq.read_table(path, columns=["value"])
    return summary(t.column("value").to_numpy())


def read_rasterio(path):
    import rasterio
    from rasterio.windows import Window
    with rasterio.open(path) as src:
        a = src.read(1, window=Window(col_off=1800, row_off=src.height // 2 - 300, width=800, height=600))
    return summary(a)


def read_sqlite(path):
    import sqlite3, urllib.parse
    con = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro&immutable=1", uri=True)
    try:
        n, s, t0, t1 = con.execute(
            "SELECT count(*), sum(value), min(t), max(t) FROM readings WHERE station = ?",
            (STATION,)).fetchone()
    finally:
        con.close()
    return {"rows": n, "sum": round(s or 0.0, 6), "t": [t0, t1]}


# The options of both open_mfdataset calls (the read and its warm-up). What
# a careful user passes: the files in name order are the days in order, so
# they are put end to end along time ("nested") rather than ordered by
# reading every file's time values first ("by_coords"); lat, lon and the
# attributes are taken from the first file instead of being read and
# compared in all 30 ("minimal", "override", the performance advice of
# xarray's documentation), yet the grids must be the same (join="exact":
# the indexes are read at open anyway); one process, no dask workers
# (parallel=False); the netCDF4 library, as read_xarray. Explicit, too,
# because xarray's defaults for these have been changing between releases.
MF_OPTIONS = dict(engine="netcdf4", combine="nested", concat_dim="time", data_vars="minimal",
                  coords="minimal", compat="override", join="exact", parallel=False)


def read_xarray_mf(path):
    import glob, xarray as xr
    files = sorted(glob.glob(os.path.join(path, SERIES_GLOB)))
    if len(files) != SERIES_DAYS:  # a tool that lists the folder short would read a shorter series
        raise RuntimeError(f"{len(files)} files match {SERIES_GLOB} in {path}, not {SERIES_DAYS}")
    with xr.open_mfdataset(files, **MF_OPTIONS) as ds:
        a = ds["temp"].sel(lat=POINT[0], lon=POINT[1], method="nearest").load().values
    return summary(a)


# reader name -> (file, function); the order of the benchmark's rows. The
# file of a series is its folder (see reader_files).
READERS = {
    "xarray": ("ocean.nc", read_xarray),
    "h5py": ("grid.h5", read_h5py),
    "pyarrow": ("table.parquet", read_pyarrow),
    "rasterio": ("dem.tif", read_rasterio),
    "sqlite3": ("index.sqlite", read_sqlite),
    "xarray_mf": (SERIES_DIR, read_xarray_mf),
}


def reader_files(reader):
    """The fixtures (paths in the dataset folder) a reader reads: its file,
    or the files of its series folder."""
    fname = READERS[reader][0]
    return SERIES if fname == SERIES_DIR else [fname]


def warm_up(reader, tmp):
    """Imports the reader's library and opens a tiny local file of its
    format the way the reader will, so that lazy imports, plugin and driver
    registration are not timed."""
    import numpy as np
    a = np.arange(64, dtype="f4").reshape(8, 8)
    p = os.path.join(tmp, "w")
    if reader == "xarray":
        import xarray as xr, netCDF4
        with netCDF4.Dataset(p, "w") as ds:
            ds.createDimension("lat", 8)
            ds.createDimension("lon", 8)
            ds.createVariable("temp", "f4", ("lat", "lon"), zlib=True)[:] = a
        with xr.open_dataset(p, engine="netcdf4") as ds:
            ds["temp"].isel(lat=slice(0, 2)).values
    elif reader == "xarray_mf":
        # Two tiny days, combined as the series will be: dask and xarray's
        # combining code are imported and run once.
        import xarray as xr, netCDF4
        paths = []
        for day in range(2):
            paths.append(f"{p}{day}.nc")
            with netCDF4.Dataset(paths[-1], "w") as ds:
                ds.createDimension("time", None)
                ds.createDimension("lat", 8)
                ds.createDimension("lon", 8)
                t = ds.createVariable("time", "f8", ("time",))
                t.units = "hours since 2024-01-01 00:00:00"
                t[:] = [day * 2, day * 2 + 1]
                ds.createVariable("lat", "f8", ("lat",))[:] = np.arange(8)
                ds.createVariable("lon", "f8", ("lon",))[:] = np.arange(8)
                ds.createVariable("temp", "f4", ("time", "lat", "lon"), zlib=True)[:] = np.stack([a, a])
        with xr.open_mfdataset(paths, **MF_OPTIONS) as ds:
            ds["temp"].sel(lat=3.2, lon=4.9, method="nearest").load().values
    elif reader == "h5py":
        import h5py
        with h5py.File(p, "w") as f:
            f.create_dataset("x", data=a, chunks=(4, 4), compression="gzip", shuffle=True)
        with h5py.File(p, "r") as f:
            f["x"][1:3, 1:3]
    elif reader == "pyarrow":
        import pyarrow as pa, pyarrow.parquet as pq
        pq.write_table(pa.table({"value": a.ravel()}), p)
        pq.read_table(p, columns=["value"])
    elif reader == "rasterio":
        import rasterio
        from rasterio.windows import Window
        from rasterio.transform import from_origin
        with rasterio.open(p + ".tif", "w", driver="GTiff", width=8, height=8, count=1,
                           dtype="float32", compress="deflate", crs="EPSG:4326",
                           transform=from_origin(140, -10, 0.1, 0.1)) as dst:
            dst.write(a, 1)
        with rasterio.open(p + ".tif") as src:
            src.read(1, window=Window(0, 0, 2, 2))
    elif reader == "sqlite3":
        import sqlite3, urllib.parse
        con = sqlite3.connect(p)
        con.executescript("CREATE TABLE t (a INTEGER); CREATE INDEX i ON t (a); INSERT INTO t VALUES (1);")
        con.close()
        con = sqlite3.connect(f"file:{urllib.parse.quote(p)}?mode=ro&immutable=1", uri=True)
        con.execute("SELECT count(*) FROM t WHERE a = ?", (1,)).fetchone()
        con.close()


def rchar():
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def run_reader(reader, path):
    with tempfile.TemporaryDirectory(prefix="science-warm-") as tmp:
        warm_up(reader, tmp)
    fn = READERS[reader][1]
    r0 = rchar()
    t0 = time.perf_counter()
    result = fn(path)
    secs = time.perf_counter() - t0
    r1 = rchar()
    return {"seconds": secs, "result": result, "rchar": r1 - r0}


def main(argv):
    if len(argv) >= 2 and argv[0] == "gen":
        print(json.dumps(gen(argv[1], int(argv[2]) if len(argv) > 2 else 1)))
    elif len(argv) == 3 and argv[0] == "read" and argv[1] in READERS:
        print(json.dumps(run_reader(argv[1], argv[2])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
