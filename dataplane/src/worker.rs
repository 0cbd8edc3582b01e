//! The pinned busy-poll loop that ties `xsk` rings to the `pipeline`.
