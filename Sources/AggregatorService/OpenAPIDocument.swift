/// The OpenAPI document, compiled into the binary from `Resources/openapi.yaml` (the top-level
/// `openapi.yaml` is a link to it), so a copied or static binary still serves it.
enum OpenAPIDocument {
    static let text = String(decoding: PackageResources.openapi_yaml, as: UTF8.self)
}
