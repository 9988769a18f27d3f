//! Linux specifics of supervisor integration: abstract unix socket addresses, which systemd
//! uses for `NOTIFY_SOCKET="@..."` (user managers, containers, tests).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;

/// The socket address for the abstract name `name` (without the leading `@`/NUL).
pub(super) fn abstract_socket_addr(name: &[u8]) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(name)
}
