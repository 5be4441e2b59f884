//! Children get their stdio and nothing else.
//!
//! libtss2's `swtpm:` TCTI opens one TCP connection per TPM command, without close-on-exec
//! (strace shows `socket(AF_INET, SOCK_STREAM, 0)`). A process spawned by another thread while
//! a command is in flight inherits that connection and keeps it open after the parent closes
//! its copy; swtpm serves one connection at a time, so it then waits on that connection
//! forever, and every later command to that TPM (the parent's, or the child's own) hangs.
//! Seen as test runs stuck with every swtpm idle, each holding a connection whose other end
//! was in another swtpm. [`close_inherited_fds`] marks every descriptor above stderr
//! close-on-exec in the child, between fork and exec, so the exec drops whatever leaked.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The highest descriptor the fallback walks when close_range(2) is missing (Linux < 5.11).
const FALLBACK_MAX_FD: libc::c_int = 65_536;

/// Makes `command`'s child close, at exec, every descriptor it inherited besides 0, 1 and 2.
/// Std's own exec-error pipe is close-on-exec already, so spawn errors still reach the parent.
pub fn close_inherited_fds(command: &mut Command) -> &mut Command {
    // SAFETY: the hook runs in the forked child before exec and only makes close_range(2) or
    // fcntl(2) system calls, which are async-signal-safe; it allocates nothing and touches no
    // memory shared with the parent.
    unsafe { command.pre_exec(mark_close_on_exec_above_stderr) }
}

/// In the child: every descriptor from 3 up gets close-on-exec.
fn mark_close_on_exec_above_stderr() -> std::io::Result<()> {
    // SAFETY: a system call on this process's descriptor table only.
    let marked = unsafe {
        libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    };
    if marked != 0 {
        for fd in 3..FALLBACK_MAX_FD {
            // SAFETY: as above; EBADF on a closed descriptor is ignored.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags >= 0 {
                // SAFETY: as above.
                unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptors a `sh` child holds, by /proc/self/fd of the shell itself.
    fn child_fds(command: &mut Command) -> Vec<String> {
        let output = command.arg("-c").arg("ls /proc/$$/fd").output().unwrap();
        String::from_utf8(output.stdout)
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_descriptor_without_close_on_exec_reaches_a_child_only_without_the_hook() {
        // SAFETY: a plain socket(2), as libtss2 makes it; closed below.
        let leaked = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(leaked > 2);
        let name = leaked.to_string();
        let plain = child_fds(&mut Command::new("sh"));
        let mut hooked = Command::new("sh");
        close_inherited_fds(&mut hooked);
        let closed = child_fds(&mut hooked);
        // SAFETY: closes the descriptor this test opened.
        unsafe { libc::close(leaked) };
        assert!(
            plain.contains(&name),
            "without the hook the child inherits it: {plain:?}"
        );
        assert!(
            !closed.contains(&name),
            "with the hook it does not: {closed:?}"
        );
    }

    #[test]
    fn a_missing_program_is_still_reported_as_not_found() {
        let mut command = Command::new("/nonexistent/keyshard-no-such-program");
        close_inherited_fds(&mut command);
        let error = command.spawn().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    }
}
