use natty_runtime::prelude::*;

#[consumer(stream = "jobs", durable = "workers")]
async fn work<T: serde::de::DeserializeOwned + Send + 'static>(job: T) {
    let _ = job;
}

fn main() {}
