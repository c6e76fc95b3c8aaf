//! What other programs of the workspace use of the CLI: the daemon client
//! (the containerd shim talks to bangerd as the CLI does).

pub mod client;
