//! Process-wide settings of the host OS, applied once at start-up.

use std::io;

/// Turns transparent huge pages on or off for this process (Linux `prctl`).
///
/// Off by default for `keydrop serve`: the first write to a fresh 2 MiB huge page
/// zeroes all of it inside the page fault, and on a virtual machine whose memory
/// the host backs lazily that fault was measured at 4–9 ms. It lands on whichever
/// thread first touches the page, often a SKU's actor, and every buyer of that SKU
/// waits behind it: under `wrk -t2 -c64` the maximum order latency went from 165 ms
/// to 18 ms with huge pages off (alternating runs, 44–47k vs 35–45k orders/s).
/// Databases that care about tail latency (Redis among them) advise the same.
pub fn set_transparent_huge_pages(enabled: bool) -> io::Result<()> {
    let disable = libc::c_ulong::from(!enabled);
    // SAFETY: PR_SET_THP_DISABLE takes one integer argument and the unused ones
    // must be zero; it touches no memory of ours.
    let status = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, disable, 0, 0, 0) };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets SIGPIPE end the process, as it ends other command-line tools: an operator
/// command piped into `head` stops quietly once `head` has read enough, instead of
/// panicking in `println!` (Rust ignores SIGPIPE by default, so the write fails).
/// Only for the operator commands: a node must outlive a client that went away.
pub fn exit_quietly_on_closed_stdout() {
    // SAFETY: restores a signal's default disposition; no handler of ours is
    // replaced, and nothing else in the process relies on SIGPIPE being ignored.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether transparent huge pages are off for this process.
#[cfg(test)]
fn transparent_huge_pages_disabled() -> io::Result<bool> {
    // SAFETY: PR_GET_THP_DISABLE takes no arguments and returns the flag.
    let status = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    if status < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(status == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_switched_for_the_process() {
        set_transparent_huge_pages(false).unwrap();
        assert!(transparent_huge_pages_disabled().unwrap());
        set_transparent_huge_pages(true).unwrap();
        assert!(!transparent_huge_pages_disabled().unwrap());
    }
}
