// The app: a Kotlin UI (MainActivity) over the native core through JNI (org.pocketfusion.PfNative -> libpfjni.so, built
// by the NDK from src/main/cpp/CMakeLists.txt with apps/native's sources and ExecuTorch's Android libraries).
// Never built: see apps/README.md. ExecuTorch for Android: pass -PexecutorchRoot=DIR, a folder with include/, lib/ and
// lib/cmake/executorch of an arm64-v8a build (ExecuTorch's `cmake --preset android-arm64-v8a` + install).
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val executorchRoot: String = (project.findProperty("executorchRoot") as String?) ?: ""

android {
    namespace = "org.pocketfusion.app"
    compileSdk = 34
    ndkVersion = "26.3.11579264"

    defaultConfig {
        applicationId = "org.pocketfusion.app"
        minSdk = 26
        targetSdk = 34
        versionCode = 1
        versionName = "0.2.0"
        ndk { abiFilters += listOf("arm64-v8a") }
        externalNativeBuild {
            cmake {
                arguments += listOf("-DEXECUTORCH_ROOT=$executorchRoot", "-DANDROID_STL=c++_shared")
                cppFlags += listOf("-std=c++17", "-O2")
            }
        }
    }
    externalNativeBuild {
        cmake {
            path = file("src/main/cpp/CMakeLists.txt")
            version = "3.28.0+"
        }
    }
    buildTypes {
        release { isMinifyEnabled = false }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}
