import SwiftUI

/// The iOS app: add App/*.swift and Sources/PocketFusionCore (or the package) to an Xcode iOS app target, and the export
/// folder (`pocketfusion export MODEL --target coreml -o export`) to its resources as a folder reference named
/// "export". Never built or run (apps/README.md).
@main
struct PocketFusionApp: App {
    var body: some Scene { WindowGroup { ContentView() } }
}
