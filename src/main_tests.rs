//! Unit tests of `main.rs`, in a file of their own so that the code
//! stays short enough to read in one go.

use super::*;

fn shut_down(by_guest: bool) -> Ending {
    Ending::ShutDown {
        reason: "guest-shutdown".into(),
        by_guest,
    }
}

#[test]
fn a_panic_fails_the_run_even_after_ctrl_c() {
    for interrupted in [false, true] {
        assert_eq!(
            run_exit_code(&Ending::Panicked, ExitStatus::Code(0), interrupted),
            1
        );
    }
}

#[test]
fn ctrl_c_exits_130_however_qemu_ended() {
    for ending in [
        shut_down(true),
        shut_down(false),
        Ending::Unannounced(ExitStatus::Signal(9)),
    ] {
        assert_eq!(
            run_exit_code(&ending, ExitStatus::Code(0), true),
            EXIT_INTERRUPTED
        );
    }
}

#[test]
fn a_guest_power_off_or_a_zero_exit_succeeds_and_anything_else_fails() {
    assert_eq!(
        run_exit_code(&shut_down(true), ExitStatus::Unknown, false),
        0
    );
    assert_eq!(
        run_exit_code(&shut_down(false), ExitStatus::Code(0), false),
        0
    );
    assert_eq!(
        run_exit_code(&shut_down(false), ExitStatus::Code(1), false),
        1
    );
    let crashed = ExitStatus::Signal(libc::SIGSEGV);
    assert_eq!(
        run_exit_code(&Ending::Unannounced(crashed), crashed, false),
        1
    );
    assert_eq!(
        run_exit_code(
            &Ending::Unannounced(ExitStatus::Code(0)),
            ExitStatus::Code(0),
            false
        ),
        0
    );
}
