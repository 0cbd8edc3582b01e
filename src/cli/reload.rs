//! `egressd reload`: ask a running gateway to re-read its configuration (same as SIGHUP, but says the outcome).

use std::process::ExitCode;

pub fn reload(args: super::AdminArgs) -> anyhow::Result<ExitCode> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let (status, body) = crate::admin::http_request_with(args.admin, "POST", "/reload", token.as_deref())?;
    if status == 200 {
        println!("{}", body.trim());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("reload refused, running configuration kept:\n{}", body.trim());
        Ok(ExitCode::FAILURE)
    }
}
