//! `egressd reload`: ask a running gateway to re-read its configuration (same as SIGHUP, but says the outcome).

use std::process::ExitCode;

pub fn reload(args: super::AdminArgs) -> anyhow::Result<ExitCode> {
    let token = args.token()?;
    let (status, body) = crate::admin::http_request_with(args.admin, "POST", "/reload", token.as_deref())?;
    if status == 200 {
        println!("{}", body.trim());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("reload refused, running configuration kept:\n{}", body.trim());
        Ok(ExitCode::FAILURE)
    }
}
