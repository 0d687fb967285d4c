fn main() -> std::process::ExitCode {
    metapoison::cli::main()
}
