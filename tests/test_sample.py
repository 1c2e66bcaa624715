import gzip

import pyarrow.parquet as pq

from flywheel.data.sample import write_sample
from tests.conftest import REPO

SAMPLE = REPO / "data/raw/sample"
FEEDBACK = REPO / "data/raw/feedback"


def _content(path):
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def test_committed_sample_is_what_the_generator_writes(tmp_path):
    """The sample in git is reproducible from the script (content-wise: Parquet and gzip
    containers may differ in library version stamps)."""
    write_sample(tmp_path / "sample", tmp_path / "feedback")
    for generated_dir, committed_dir in ((tmp_path / "sample", SAMPLE), (tmp_path / "feedback", FEEDBACK)):
        generated = sorted(p.name for p in generated_dir.iterdir())
        assert generated == sorted(p.name for p in committed_dir.iterdir())
        for name in generated:
            assert _content(generated_dir / name) == _content(committed_dir / name), name
