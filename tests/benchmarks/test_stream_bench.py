import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from stream import times_four  # noqa: E402

from mbm.data.source import resolve_data  # noqa: E402
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset  # noqa: E402


def test_four_times_view_lists_every_shard_four_times_and_reads_as_a_dataset(tmp_path):
    write_synthetic_dataset(str(tmp_path / "x1"), SyntheticConfig(num_samples=30, samples_per_shard=8, seed=1))
    source = resolve_data(str(tmp_path / "x1"))
    view = resolve_data(times_four(source, str(tmp_path / "x4")))
    assert len(view.shards) == 4 * len(source.shards) and view.shard_sizes == 4 * source.shard_sizes
    assert [Path(p).resolve() for p in view.shards] == 4 * [Path(p).resolve() for p in source.shards]
    assert view.labels == source.labels and view.feature_dims == source.feature_dims
    assert sum(view.shard_sizes) == 120
