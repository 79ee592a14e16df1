// swift-tools-version:5.9
// pocketfusion's iOS core: an export directory's Core ML networks (coreml/*.mlpackage) and the pipeline logic of
// runtimes/pipeline.py (CLIP BPE, schedulers, torch's generator, CFG or embedded guidance). The SwiftUI app (App/)
// adds these sources to an Xcode iOS app target. Never built: no Swift toolchain or Xcode here (apps/README.md).
import PackageDescription

let package = Package(
    name: "PocketFusion",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [.library(name: "PocketFusionCore", targets: ["PocketFusionCore"])],
    targets: [.target(name: "PocketFusionCore", path: "Sources/PocketFusionCore")]
)
