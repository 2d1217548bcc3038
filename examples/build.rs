//! Compiles the example's `.proto` files with protox (a Rust protobuf compiler, so no
//! `protoc` is needed) and generates prost types that also derive natty's `Payload`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["orders/v1/orders.proto"], ["proto"])?;
    prost_build::Config::new()
        .type_attribute(
            ".orders.v1.OrderPlaced",
            r#"#[derive(natty_runtime::Payload)] #[payload(subject = "orders.placed.{customer}", format = "protobuf")]"#,
        )
        .type_attribute(
            ".orders.v1.OrderInvoiced",
            r#"#[derive(natty_runtime::Payload)] #[payload(subject = "orders.invoiced.{customer}", format = "protobuf")]"#,
        )
        .compile_fds(descriptors)?;
    Ok(())
}
