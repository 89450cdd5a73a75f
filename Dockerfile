# One image with the three binaries: weir-broker (the broker), weir-operator (the operator)
# and weir (the CLI). The chart runs the operator from it and the operator runs the brokers
# from it.
#
#   docker build -t ghcr.io/weir-dev/weir:0.1.0 .
#
# The binaries are built with the same command and lock file as `cargo build --release
# --locked` in the repository (the profile the benchmarks use; the tests run the same code
# in the dev profile).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin weir-broker --bin weir-operator --bin weir \
 && mkdir /out \
 && cp target/release/weir-broker target/release/weir-operator target/release/weir /out/

# distroless/cc: glibc and libgcc only, no shell; runs as UID 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 7070 7071 8080
ENTRYPOINT ["weir-broker"]
CMD ["--data-dir", "/var/lib/weir"]
