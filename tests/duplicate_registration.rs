//! Two tasks (and two flows) with one name: a clear start-up error naming both
//! definitions. This binary deliberately defines the clash, so it lives alone.

use pinazu_flows::prelude::*;

mod billing {
    use super::*;

    #[task(name = "send_invoice")]
    pub async fn send(id: u64) -> anyhow::Result<u64> {
        Ok(id)
    }

    #[flow(name = "monthly")]
    pub async fn run_month() -> anyhow::Result<u64> {
        Ok(send(1).await?)
    }
}

mod mailing {
    use super::*;

    #[task(name = "send_invoice")]
    pub async fn send(id: u64) -> anyhow::Result<u64> {
        Ok(id + 1)
    }

    #[flow(name = "monthly")]
    pub async fn run_month() -> anyhow::Result<u64> {
        Ok(send(1).await?)
    }
}

#[test]
fn duplicate_names_are_a_start_up_error_naming_both_definitions() {
    let err = pinazu_shared::registry::Registry::global().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("task `send_invoice` is defined twice"),
        "{msg}"
    );
    assert!(msg.contains("flow `monthly` is defined twice"), "{msg}");
    assert!(msg.contains("duplicate_registration::billing"), "{msg}");
    assert!(msg.contains("duplicate_registration::mailing"), "{msg}");
    assert!(msg.contains("tests/duplicate_registration.rs:"), "{msg}");
}

#[tokio::test]
async fn the_runtime_refuses_to_start_with_duplicates() {
    let err = Runtime::embedded(RuntimeConfig::default())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("defined twice"), "{err}");
    // the generated functions are real, even though the program cannot run them
    let _ = (billing::run_month, mailing::run_month);
}
