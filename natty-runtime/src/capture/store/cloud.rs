//! The cloud backends of a block store: S3 and Azure Blob storage through `object_store`,
//! configured from the standard environment variables (and a store's own prefixed ones), with
//! `object_store`'s retries bounded by `NATTY_STORE_MAX_RETRIES` / `NATTY_STORE_RETRY_TIMEOUT`.

use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::{ObjectStore, RetryConfig};

use super::StoreError;

/// The well-known Azurite account, used with `AZURE_STORAGE_USE_EMULATOR=true`.
pub(super) const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// The well-known (public) Azurite account key.
pub(super) const EMULATOR_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Where Azurite listens by default.
pub(super) const EMULATOR_URL: &str = "http://127.0.0.1:10000";

/// How many times one request to S3 or Azure is retried; `object_store`'s default is 10.
pub const MAX_RETRIES_ENV: &str = "NATTY_STORE_MAX_RETRIES";
/// How long one request to S3 or Azure is retried, e.g. `30s`; `object_store`'s default is 3 min.
pub const RETRY_TIMEOUT_ENV: &str = "NATTY_STORE_RETRY_TIMEOUT";

/// `object_store`'s settings shared by S3 and Azure, as the suffix of `AWS_<NAME>` / `AZURE_<NAME>`.
pub(super) const CLIENT_ENV_SUFFIXES: &[&str] = &[
    "ALLOW_HTTP",
    "ALLOW_INVALID_CERTIFICATES",
    "CONNECT_TIMEOUT",
    "DEFAULT_CONTENT_TYPE",
    "DISABLE_SYSTEM_CERTIFICATES",
    "HTTP1_ONLY",
    "HTTP2_ONLY",
    "HTTP2_KEEP_ALIVE_INTERVAL",
    "HTTP2_KEEP_ALIVE_TIMEOUT",
    "HTTP2_KEEP_ALIVE_WHILE_IDLE",
    "HTTP2_MAX_FRAME_SIZE",
    "POOL_IDLE_TIMEOUT",
    "POOL_MAX_IDLE_PER_HOST",
    "PROXY_URL",
    "PROXY_CA_CERTIFICATE",
    "PROXY_EXCLUDES",
    "RANDOMIZE_ADDRESSES",
    "READ_TIMEOUT",
    "TIMEOUT",
    "USER_AGENT",
];

/// The environment variables an `s3://` store reads (besides `AWS_` + each client setting such as
/// `AWS_TIMEOUT` or `AWS_PROXY_URL`): those `AmazonS3Builder::from_env` understands, less
/// `AWS_BUCKET`, which the URL gives.
pub const S3_ENV_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_S3_EXPRESS",
    "AWS_IMDSV1_FALLBACK",
    "AWS_METADATA_ENDPOINT",
    "AWS_UNSIGNED_PAYLOAD",
    "AWS_CHECKSUM_ALGORITHM",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_SKIP_SIGNATURE",
    "AWS_COPY_IF_NOT_EXISTS",
    "AWS_CONDITIONAL_PUT",
    "AWS_DISABLE_TAGGING",
    "AWS_DISABLE_BULK_DELETE",
    "AWS_REQUEST_PAYER",
    "AWS_SERVER_SIDE_ENCRYPTION",
    "AWS_SSE_KMS_KEY_ID",
    "AWS_SSE_BUCKET_KEY_ENABLED",
    "AWS_SSE_CUSTOMER_KEY_BASE64",
];

/// The environment variables an `az://` store reads (besides `AZURE_` + each client setting):
/// those `MicrosoftAzureBuilder::from_env` understands, less `AZURE_CONTAINER_NAME`, which the
/// URL gives, plus the emulator's `AZURE_STORAGE_USE_EMULATOR` and `AZURITE_BLOB_STORAGE_URL`.
/// `IDENTITY_ENDPOINT` is last, as `from_env` lets it win over `AZURE_MSI_ENDPOINT`.
pub const AZURE_ENV_VARS: &[&str] = &[
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_CLIENT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_TENANT_ID",
    "AZURE_STORAGE_AUTHORITY_ID",
    "AZURE_TENANT_ID",
    "AZURE_AUTHORITY_ID",
    "AZURE_STORAGE_AUTHORITY_HOST",
    "AZURE_AUTHORITY_HOST",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_ENDPOINT",
    "AZURE_ENDPOINT",
    "AZURE_MSI_ENDPOINT",
    "AZURE_IDENTITY_ENDPOINT",
    "AZURE_OBJECT_ID",
    "AZURE_MSI_RESOURCE_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_USE_FABRIC_ENDPOINT",
    "AZURE_USE_AZURE_CLI",
    "AZURE_SKIP_SIGNATURE",
    "AZURE_DISABLE_TAGGING",
    "AZURE_FABRIC_TOKEN_SERVICE_URL",
    "AZURE_FABRIC_WORKLOAD_HOST",
    "AZURE_FABRIC_SESSION_TOKEN",
    "AZURE_FABRIC_CLUSTER_IDENTIFIER",
    "AZURE_CREDENTIAL_TYPE",
    "AZURE_STORAGE_ENCRYPTION_KEY",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURITE_BLOB_STORAGE_URL",
    "IDENTITY_ENDPOINT",
];

/// Reads the retry settings shared by S3 and Azure.
pub(super) fn retry_config(
    url: &str,
    scheme: &'static str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RetryConfig, StoreError> {
    let config_error = |reason: String| StoreError::Config {
        url: url.to_owned(),
        scheme,
        reason,
    };
    let mut retry = RetryConfig::default();
    if let Some(value) = env(MAX_RETRIES_ENV) {
        retry.max_retries = value
            .trim()
            .parse()
            .map_err(|err| config_error(format!("{MAX_RETRIES_ENV}={value:?}: {err}")))?;
    }
    if let Some(value) = env(RETRY_TIMEOUT_ENV) {
        retry.retry_timeout = humantime::parse_duration(value.trim())
            .map_err(|err| config_error(format!("{RETRY_TIMEOUT_ENV}={value:?}: {err} (e.g. 30s, 2m)")))?;
    }
    Ok(retry)
}

/// reqwest is built without a default TLS crypto provider (`rustls-no-provider`, so no aws-lc
/// C build) and panics when it builds a client with none installed, even for plain http.
/// Installing ring, the provider async-nats already uses, fails harmlessly when one is there.
pub(super) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(super) fn build_s3(
    url: &str,
    bucket: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let config_error = |reason: String| StoreError::Config {
        url: url.to_owned(),
        scheme: "s3",
        reason,
    };
    let mut builder = AmazonS3Builder::new();
    for name in env_names(S3_ENV_VARS, "AWS_") {
        if let Some(value) = env(&name) {
            let key: AmazonS3ConfigKey = name
                .to_ascii_lowercase()
                .parse()
                .map_err(|err| config_error(format!("{name}: {err}")))?;
            builder = builder.with_config(key, value);
        }
    }
    let builder = builder
        .with_bucket_name(bucket)
        .with_retry(retry_config(url, "s3", env)?);
    install_crypto_provider();
    let store = builder.build().map_err(|err| config_error(err.to_string()))?;
    Ok(Arc::new(store))
}

pub(super) fn build_azure(
    url: &str,
    container: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let config_error = |reason: String| StoreError::Config {
        url: url.to_owned(),
        scheme: "az",
        reason,
    };
    // object_store's own emulator mode reads AZURITE_BLOB_STORAGE_URL from the process
    // environment, not through the builder, so `env` could not reach it. The emulator mode is
    // the same as a plain account whose endpoint is `<emulator URL>/<account>` over http with
    // the well-known key (the Shared Key signature covers the same path either way), so that is
    // what is built here instead.
    let emulator = env("AZURE_STORAGE_USE_EMULATOR").is_some_and(|value| is_truthy(&value));
    let mut builder = MicrosoftAzureBuilder::new();
    let mut has_credential = false;
    for name in env_names(AZURE_ENV_VARS, "AZURE_") {
        if matches!(name.as_str(), "AZURE_STORAGE_USE_EMULATOR" | "AZURITE_BLOB_STORAGE_URL")
            || (emulator && matches!(name.as_str(), "AZURE_STORAGE_ENDPOINT" | "AZURE_ENDPOINT"))
        {
            continue;
        }
        if let Some(value) = env(&name) {
            let key: AzureConfigKey = name
                .to_ascii_lowercase()
                .parse()
                .map_err(|err| config_error(format!("{name}: {err}")))?;
            has_credential |= matches!(
                key,
                AzureConfigKey::AccessKey | AzureConfigKey::SasKey | AzureConfigKey::Token
            );
            builder = builder.with_config(key, value);
        }
    }
    if emulator {
        let account = env("AZURE_STORAGE_ACCOUNT_NAME").unwrap_or_else(|| EMULATOR_ACCOUNT.to_owned());
        let service = env("AZURITE_BLOB_STORAGE_URL").unwrap_or_else(|| EMULATOR_URL.to_owned());
        builder = builder
            .with_account(&account)
            .with_endpoint(format!("{}/{account}", service.trim_end_matches('/')))
            .with_allow_http(true);
        if !has_credential {
            builder = builder.with_access_key(EMULATOR_ACCOUNT_KEY);
        }
    }
    let builder = builder
        .with_container_name(container)
        .with_retry(retry_config(url, "az", env)?);
    install_crypto_provider();
    let store = builder.build().map_err(|err| config_error(err.to_string()))?;
    Ok(Arc::new(store))
}

/// The listed names plus `<prefix><client setting>` for each of `object_store`'s client settings.
pub(super) fn env_names(names: &[&str], prefix: &str) -> Vec<String> {
    names
        .iter()
        .map(|name| (*name).to_owned())
        .chain(CLIENT_ENV_SUFFIXES.iter().map(|suffix| format!("{prefix}{suffix}")))
        .collect()
}

/// `object_store`'s reading of a boolean setting.
pub(super) fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes" | "y"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_variable_is_an_object_store_setting() {
        for name in env_names(S3_ENV_VARS, "AWS_") {
            let parsed: Result<AmazonS3ConfigKey, _> = name.to_ascii_lowercase().parse();
            assert!(parsed.is_ok(), "{name}");
        }
        for name in env_names(AZURE_ENV_VARS, "AZURE_") {
            if name == "AZURITE_BLOB_STORAGE_URL" {
                continue;
            }
            let parsed: Result<AzureConfigKey, _> = name.to_ascii_lowercase().parse();
            assert!(parsed.is_ok(), "{name}");
        }
    }
}
