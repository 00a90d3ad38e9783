"""Data: images read safely (`images`), sources by name (`sources`, `hymenoptera`), partitioners (`partitions`),
and what a process keeps loaded between messages (`resident`).

`load_split(source, split, ...)` is what a server or a client asks for; `partitioning` (or
`partition`, as lists) and `split_validation` decide which examples each client holds, and
`training_subset` which of them it trains on; a client gets the split and its partitioning through
`resident_split` and `resident_partitioning`, once per process.
"""

from fedtune.data import hymenoptera  # noqa: F401 - registers the hymenoptera source
from fedtune.data.images import (
    MAX_IMAGE_PIXELS,
    BadImageError,
    BadImages,
    ImageDataset,
    Split,
    check_image_files,
    read_image,
)
from fedtune.data.partitions import (
    Partitioning,
    fingerprint,
    partition,
    partitioning,
    split_validation,
    training_subset,
)
from fedtune.data.resident import ResidentSplit, resident_partitioning, resident_split
from fedtune.data.sources import DOWNLOADING_SOURCES, SOURCES, check_source, load_split

__all__ = [
    "DOWNLOADING_SOURCES", "MAX_IMAGE_PIXELS", "SOURCES", "BadImageError", "BadImages", "ImageDataset", "Partitioning",
    "ResidentSplit", "Split", "check_image_files", "check_source", "fingerprint", "load_split", "partition",
    "partitioning", "read_image", "resident_partitioning", "resident_split", "split_validation", "training_subset",
]
