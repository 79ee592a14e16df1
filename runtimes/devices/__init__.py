"""Device back-ends of the bench: Android over adb, iOS/macOS, an ARM64 emulator, device profiles."""
