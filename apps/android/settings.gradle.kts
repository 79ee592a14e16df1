// pocketfusion Android app (never built here: no Android SDK, NDK or Gradle plugin on the development machine).
pluginManagement {
    repositories { google(); mavenCentral(); gradlePluginPortal() }
}
dependencyResolutionManagement {
    repositories { google(); mavenCentral() }
}
rootProject.name = "pocketfusion"
include(":app")
