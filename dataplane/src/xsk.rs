//! AF_XDP: UMEM, fill/completion/rx/tx rings, sockets. The only module allowed `unsafe`; each block has a `// SAFETY:` comment.
