//! Fault tests across real containers; everything is in `tests/it` (see its module docs).
