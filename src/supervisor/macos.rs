//! macOS specifics of supervisor integration. launchd has no notify socket, so the only thing
//! to say is that abstract addresses do not exist. (Not compiled on the Linux build hosts: keep
//! it this small.)

use std::io;
use std::os::unix::net::SocketAddr;

/// Abstract unix socket names are a Linux feature.
pub(super) fn abstract_socket_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix socket addresses exist only on Linux",
    ))
}
