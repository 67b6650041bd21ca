//! A sequential pipeline of dependent tasks, like the original library's
//! `math_pipeline(5, 3)`: each step takes the previous step's output.
//!
//! ```text
//! cargo run --example example_flow -- --a=5 --b=3
//! ```

use pinazu_flows::prelude::*;

/// a + b
#[task]
async fn add(a: i64, b: i64) -> anyhow::Result<i64> {
    Ok(a + b)
}

/// a * b
#[task]
async fn multiply(a: i64, b: i64) -> anyhow::Result<i64> {
    Ok(a * b)
}

/// a - b
#[task]
async fn subtract(a: i64, b: i64) -> anyhow::Result<i64> {
    Ok(a - b)
}

/// Describes a number (cached by input across runs).
#[task(cache = "inputs", version = "1")]
async fn describe(x: i64) -> anyhow::Result<String> {
    Ok(format!(
        "{x} is {} and {}",
        if x % 2 == 0 { "even" } else { "odd" },
        if x < 0 { "negative" } else { "non-negative" }
    ))
}

/// ((a + b) * 2 - 1), then a description of it.
#[flow]
async fn math_pipeline(#[default(5)] a: i64, #[default(3)] b: i64) -> anyhow::Result<String> {
    let sum = add(a, b).await?;
    println!("step 1: add({a}, {b}) = {sum}");
    let doubled = multiply(sum, 2).await?;
    println!("step 2: multiply({sum}, 2) = {doubled}");
    let result = subtract(doubled, 1).await?;
    println!("step 3: subtract({doubled}, 1) = {result}");
    let text = describe(result).await?;
    println!("step 4: describe({result}) = {text:?}");
    Ok(text)
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
