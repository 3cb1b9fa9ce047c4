# daprd-rs as the Dapr sidecar image: one static binary at /daprd (where the Dapr sidecar
# injector runs it), no shell, no package, a non-root user. Build:
#   docker build -t <registry>/daprd-rs:<tag> .
# and give pods the annotation dapr.io/sidecar-image: "<registry>/daprd-rs:<tag>"
# (deploy/kubernetes/README.md).

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# glibc linked statically (glibc >= 2.34 carries its `files` and `dns` name lookups in libc:
# no NSS module is loaded at run time); OpenSSL (librdkafka's TLS) from the static archives.
ENV RUSTFLAGS="-C target-feature=+crt-static" OPENSSL_STATIC=1
RUN cargo build --release --locked -p daprd --features full --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/daprd /daprd \
 && strip /daprd

# An empty base: the binary needs no file of the image but the CA bundle, for components that
# use the system roots. (deploy/kubernetes/Containerfile.test is this stage; keep them alike.)
FROM scratch
COPY --from=build /daprd /daprd
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# distroless's "nonroot" user, as Go daprd's image
USER 65532:65532
# No ENTRYPOINT: the injector passes "/daprd" and the flags as the container's arguments.
CMD ["/daprd"]
