//! The per-frame decision: parse, look up, rewrite, and say where the frame goes. Pure: no I/O, time passed in.
