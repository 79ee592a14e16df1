// CLIP BPE tokenizer: the ids of transformers' CLIPTokenizer (padding="max_length", truncation=True) from an
// export's tokenizer/ folder (vocab.json, merges.txt, special_tokens_map.json / tokenizer_config.json).
//
// Text normalisation follows CLIPTokenizer without ftfy (its BasicTokenizer fallback): NFC is assumed, text is
// lower-cased, whitespace collapsed; the pre-tokenizer pattern is CLIP's ('s|'t|'re|'ve|'m|'ll|'d|letters+|digit|
// other+). Letters and digits are exact for ASCII; any other non-space code point counts as a letter.
#pragma once

#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace pf {

class ClipTokenizer {
 public:
  explicit ClipTokenizer(const std::string& folder);

  // bos + tokens (truncated to max_length - 2) + eos, padded with the pad token to max_length
  std::vector<int32_t> encode(const std::string& text, int max_length) const;
  std::vector<std::string> tokenize(const std::string& text) const;  // BPE tokens, no specials
  int model_max_length() const { return model_max_length_; }
  int bos() const { return bos_; }
  int eos() const { return eos_; }
  int pad() const { return pad_; }

 private:
  std::unordered_map<std::string, int> vocab_;
  std::map<std::pair<std::string, std::string>, int> ranks_;
  std::string byte_to_unicode_[256];
  int bos_ = 0, eos_ = 0, pad_ = 0, unk_ = 0;
  int model_max_length_ = 77;
  mutable std::unordered_map<std::string, std::vector<std::string>> cache_;

  int id(const std::string& token) const;
  std::vector<std::string> bpe(const std::string& word) const;
};

}  // namespace pf
