"""densenet.ray on a local Ray instance (2 CPUs): the same vectors and top-k as the bulk
Parquet shards, errors for broken images."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyarrow", reason="densenet.ray needs pyarrow")
ray = pytest.importorskip("ray", reason="Ray Data is the optional 'ray' extra")
pytest.importorskip("ray.data", reason="Ray Data is the optional 'ray' extra")

from densenet import bulk  # noqa: E402
from densenet.ray import Embedder, Predictor  # noqa: E402

from test_bulk import checkpoint, folder, model, read  # noqa: E402, F401 (fixtures)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_embedder_and_predictor_match_the_bulk_output(
    local_ray, folder, model, checkpoint, tmp_path
):
    paths = [str(p) for p in sorted((folder / "5").glob("*.png"))] + [
        str(p) for p in sorted((folder / "broken").iterdir())
    ]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(paths))
    reference = {}
    for task in ("embed", "predict"):
        out = tmp_path / task
        bulk.run(manifest, out, model, bulk.Options(task=task), workers=0, progress=False)
        reference[task] = read(out).to_pandas().set_index("path")
    data = ray.data.read_binary_files(paths, include_paths=True)
    for task, callable_class, column in (
        ("embed", Embedder, "embedding"),
        ("predict", Predictor, "probabilities"),
    ):
        rows = data.map_batches(
            callable_class,
            fn_constructor_kwargs={"model": "densenet_bc_100_k12", "weights": str(checkpoint)},
            batch_size=64,
            concurrency=2,
            num_cpus=0.5,  # two actors leave a CPU of the two to the file reads
        ).to_pandas()
        assert sorted(rows["path"]) == sorted(paths) and "bytes" not in rows.columns
        rows = rows.set_index("path").loc[reference[task].index]
        broken = rows["error"].notna()
        assert sorted(rows.index[broken]) == sorted(paths[-3:])
        assert rows.loc[broken, column].isna().all()
        expected = np.stack(reference[task].loc[~broken, column])
        np.testing.assert_allclose(
            np.stack(rows.loc[~broken, column]), expected, rtol=1e-5, atol=1e-6
        )
        if task == "predict":
            assert list(rows["labels"].iloc[0]) == list(reference[task]["labels"].iloc[0])
