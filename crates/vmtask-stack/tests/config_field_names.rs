//! An `InvalidConfig` error names the field the user got wrong.

use vmtask_stack::{Config, StackError, StackPool};

mod common;
use common::{page, USER_SPACE};

fn field_of(config: Config) -> (&'static str, String) {
    match StackPool::new(config) {
        Err(StackError::InvalidConfig { field, reason }) => (field, reason),
        Err(e) => panic!("expected InvalidConfig, got {e}"),
        Ok(_) => panic!("expected InvalidConfig, got a pool"),
    }
}

/// A default 128 KiB stack with a guard just under the user address
/// space (128 TiB on 64-bit targets): each size
/// fits alone, the slot does not. The guard is what is wrong; the error
/// must not blame `stack_size`.
#[test]
fn a_huge_guard_is_named_as_the_guard() {
    let (field, reason) = field_of(Config {
        guard_size: USER_SPACE - page(),
        max_stacks: 1,
        ..Config::default()
    });
    assert_eq!(field, "guard_size", "{field} {reason}");
    assert!(reason.contains("user address space"), "{reason}");
}

/// And a huge stack with a small guard still names the stack.
#[test]
fn a_huge_stack_is_named_as_the_stack() {
    let (field, reason) = field_of(Config {
        stack_size: USER_SPACE,
        guard_size: 1,
        max_stacks: 1,
        ..Config::default()
    });
    assert_eq!(field, "stack_size", "{field} {reason}");
    assert!(reason.contains("user address space"), "{reason}");
}
