import Testing

/// Every HTTP suite nests here so that they run one test at a time: the raw clients block their
/// thread, and two at once could occupy the whole cooperative pool the server's handlers run on.
@Suite(.serialized) enum HTTPServerTests {}
