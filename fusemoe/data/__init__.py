"""FlexiModal data: on-disk contract, validation, readers (PhysioNet 2012, synthetic), Dataset."""

from fusemoe.data.flexi import FlexiModalError, load_manifest, validate, validate_dir, write_flexi
from fusemoe.data.schema import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "FlexiModalError",
    "load_manifest",
    "validate",
    "validate_dir",
    "write_flexi",
]
