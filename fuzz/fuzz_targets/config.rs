//! The TOML loader and validator on arbitrary text: never a panic; an error names a position inside the text;
//! a configuration it accepts compiles to a policy (or is refused with an error), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let source = egressd::config::Source::new("fuzz.toml", text);
    match egressd::config::parse(source) {
        Ok(loaded) => {
            let _ = egressd::policy::compile(&loaded.config, 1);
        }
        Err(errors) => {
            // Rendering the errors (file:line:column and the line itself) must not panic either.
            let _ = errors.to_string();
        }
    }
});
