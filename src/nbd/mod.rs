//! The NBD protocol: wire types (`proto`), the server and a small client.
