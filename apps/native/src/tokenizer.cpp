#include "tokenizer.h"

#include <climits>
#include <fstream>
#include <stdexcept>

#include "json.h"

namespace pf {

namespace {

std::string utf8(uint32_t cp) {
  std::string out;
  append_utf8(out, cp);
  return out;
}

// code points of a UTF-8 string (invalid bytes pass through as themselves)
std::vector<uint32_t> code_points(const std::string& s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + n > s.size()) n = 1;
    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(cp);
    i += n;
  }
  return out;
}

bool is_space(uint32_t c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
bool is_digit(uint32_t c) { return c >= '0' && c <= '9'; }
bool is_ascii_punct(uint32_t c) { return c < 0x80 && !is_space(c) && !is_digit(c) && !((c | 0x20) >= 'a' && (c | 0x20) <= 'z'); }
bool is_letter(uint32_t c) { return c < 0x80 ? ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') : !is_space(c); }

uint32_t lower(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if ((c >= 0xC0 && c <= 0xDE && c != 0xD7)) return c + 32;  // Latin-1 capitals
  return c;
}

std::string special(const Json& map, const Json& config, const std::string& key, const std::string& fallback) {
  for (const Json* j : {&map, &config}) {
    const Json& v = (*j)[key];
    if (v.is_string()) return v.as_string();
    if (v.is_object() && v["content"].is_string()) return v["content"].as_string();
  }
  return fallback;
}

}  // namespace

ClipTokenizer::ClipTokenizer(const std::string& folder) {
  // GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  bool printable[256] = {};
  for (int b : bs) printable[b] = true;
  int n = 0;
  for (int b = 0; b < 256; ++b) byte_to_unicode_[b] = utf8(printable[b] ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++));

  Json vocab = Json::parse_file(folder + "/vocab.json");
  for (const auto& kv : vocab.as_object()) vocab_[kv.first] = static_cast<int>(kv.second.as_int());
  std::ifstream merges(folder + "/merges.txt");
  if (!merges) throw std::runtime_error("cannot open " + folder + "/merges.txt");
  std::string line;
  int rank = 0;
  bool first = true;
  while (std::getline(merges, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (first && line.rfind("#version", 0) == 0) {
      first = false;
      continue;
    }
    first = false;
    size_t sp = line.find(' ');
    if (line.empty() || sp == std::string::npos) continue;
    ranks_.emplace(std::make_pair(line.substr(0, sp), line.substr(sp + 1)), rank++);
  }
  Json map, config;
  try { map = Json::parse_file(folder + "/special_tokens_map.json"); } catch (const std::runtime_error&) {}
  try { config = Json::parse_file(folder + "/tokenizer_config.json"); } catch (const std::runtime_error&) {}
  // added tokens that vocab.json lacks
  for (const auto& kv : config["added_tokens_decoder"].is_object() ? config["added_tokens_decoder"].as_object()
                                                                     : std::vector<std::pair<std::string, Json>>{}) {
    if (kv.second["content"].is_string() && !vocab_.count(kv.second["content"].as_string()))
      vocab_[kv.second["content"].as_string()] = std::stoi(kv.first);
  }
  auto need = [&](const std::string& tok) {
    auto it = vocab_.find(tok);
    if (it == vocab_.end()) throw std::runtime_error(folder + ": the tokenizer has no token " + tok);
    return it->second;
  };
  bos_ = need(special(map, config, "bos_token", "<|startoftext|>"));
  eos_ = need(special(map, config, "eos_token", "<|endoftext|>"));
  unk_ = need(special(map, config, "unk_token", "<|endoftext|>"));
  pad_ = need(special(map, config, "pad_token", "<|endoftext|>"));
  model_max_length_ = static_cast<int>(config.number_or("model_max_length", 77));
}

int ClipTokenizer::id(const std::string& token) const {
  auto it = vocab_.find(token);
  return it == vocab_.end() ? unk_ : it->second;
}

std::vector<std::string> ClipTokenizer::bpe(const std::string& token) const {
  auto hit = cache_.find(token);
  if (hit != cache_.end()) return hit->second;
  std::vector<std::string> word;
  for (uint32_t cp : code_points(token)) word.push_back(utf8(cp));
  word.back() += "</w>";
  while (word.size() > 1) {
    int best = INT_MAX;
    std::pair<std::string, std::string> bigram;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = ranks_.find({word[i], word[i + 1]});
      if (it != ranks_.end() && it->second < best) {
        best = it->second;
        bigram = it->first;
      }
    }
    if (best == INT_MAX) break;
    std::vector<std::string> merged;
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == bigram.first && word[i + 1] == bigram.second) {
        merged.push_back(word[i] + word[i + 1]);
        i += 2;
      } else {
        merged.push_back(word[i]);
        i += 1;
      }
    }
    word.swap(merged);
  }
  cache_.emplace(token, word);
  return word;
}

std::vector<std::string> ClipTokenizer::tokenize(const std::string& text) const {
  // BasicTokenizer: drop control characters, lower-case, split on whitespace; then " ".join
  std::vector<uint32_t> cps;
  for (uint32_t c : code_points(text)) {
    if (c == 0 || c == 0xFFFD) continue;
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
    else if (c < 0x20 || c == 0x7F) continue;
    cps.push_back(lower(c));
  }
  std::vector<std::string> out;
  auto emit = [&](size_t b, size_t e) {
    std::string piece;
    for (size_t k = b; k < e; ++k) piece += utf8(cps[k]);
    std::string enc;
    for (unsigned char ch : piece) enc += byte_to_unicode_[ch];
    for (const std::string& t : bpe(enc)) out.push_back(t);
  };
  static const char* contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  size_t i = 0;
  while (i < cps.size()) {
    uint32_t c = cps[i];
    if (is_space(c)) {
      ++i;
      continue;
    }
    if (c == '\'') {
      bool matched = false;
      for (const char* con : contractions) {
        size_t len = std::char_traits<char>::length(con);
        bool ok = i + len <= cps.size();
        for (size_t k = 0; ok && k < len; ++k) ok = cps[i + k] == static_cast<uint32_t>(con[k]);
        if (ok) {
          emit(i, i + len);
          i += len;
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    size_t j = i + 1;
    if (is_letter(c) && !(c < 0x80 && is_ascii_punct(c))) {
      while (j < cps.size() && is_letter(cps[j]) && !(cps[j] < 0x80 && is_ascii_punct(cps[j]))) ++j;
    } else if (is_digit(c)) {
      // one digit per token
    } else {
      while (j < cps.size() && !is_space(cps[j]) && !is_digit(cps[j]) && !(is_letter(cps[j]) && !(cps[j] < 0x80 && is_ascii_punct(cps[j])))) ++j;
    }
    emit(i, j);
    i = j;
  }
  return out;
}

std::vector<int32_t> ClipTokenizer::encode(const std::string& text, int max_length) const {
  std::vector<int32_t> ids = {bos_};
  for (const std::string& t : tokenize(text)) {
    if (static_cast<int>(ids.size()) >= max_length - 1) break;
    ids.push_back(id(t));
  }
  ids.push_back(eos_);
  while (static_cast<int>(ids.size()) < max_length) ids.push_back(pad_);
  return ids;
}

}  // namespace pf
