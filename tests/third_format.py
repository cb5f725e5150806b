"""A test-only output format, added the way docs/generation.md says: one class, registered in one line, imported by
jobs through `plugins: [tests.third_format]`. Each shard is one zip archive, OUT/zipped/images-NNNNNN.zip, of KEY.png,
KEY.json and KEY.latent.npy (float32) per image, in image order."""

from __future__ import annotations

import io
import json
import zipfile

from pipeline.io import storage
from pipeline.io.files import npy_bytes
from pipeline.io.output_formats import ShardFormat, ShardRows, register_format


class ZippedShards(ShardFormat):
    name, folder, suffix, latent_dtype = "zipped", "zipped", ".zip", "float32"

    def write(self, path: str, rows: ShardRows) -> dict:
        def members(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
                for i, key in enumerate(rows.keys):
                    condition = rows.conditions[i] if rows.conditions is not None else None
                    for name, data in ((f"{key}.png", rows.pngs[i]),
                                       (f"{key}.json", json.dumps({"seed": rows.seeds[i], "condition": condition})),
                                       *([(f"{key}.latent.npy", npy_bytes(rows.latents[i]))]
                                         if rows.latents is not None else [])):
                        archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        return storage.atomic_write(path, members)

    def read(self, path: str, columns: tuple[str, ...], count: int | None) -> list[tuple]:
        with zipfile.ZipFile(io.BytesIO(storage.read_bytes(path))) as archive:
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".png")]
            assert count is None or len(keys) == count
            names = set(archive.namelist())
            cell = {"image": lambda k: archive.read(f"{k}.png"),
                    "latent": lambda k: archive.read(f"{k}.latent.npy") if f"{k}.latent.npy" in names else None,
                    "condition": lambda k: json.loads(archive.read(f"{k}.json"))["condition"]}
            return [tuple(cell[c](k) for c in columns) for k in keys]


register_format(ZippedShards())
