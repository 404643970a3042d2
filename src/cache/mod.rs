pub mod roots;
